#pragma once
// Helpers of the multi-process tests: a free loopback port, this test binary re-executed as another
// rank (torchrun's environment), and waiting for it with a deadline.
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace mdd_test {

/// A TCP port that was free a moment ago (the kernel's choice for port 0).
inline int free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = 0;
  socklen_t len = sizeof(a);
  int port = 0;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0 &&
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) == 0)
    port = ntohs(a.sin_port);
  ::close(fd);
  return port;
}

/// Spawns this binary as rank `rank` of `world` running only the test `filter` (a gtest name such
/// as "DistChild.Collectives"), with MDD_DIST_CHILD=1 and `extra` ("NAME=value") in its
/// environment. Its standard output goes to /dev/null. Returns the pid, or -1.
inline pid_t spawn_rank(const std::string& filter, int rank, int world, int port,
                        const std::vector<std::string>& extra = {}) {
  std::vector<std::string> env = {"RANK=" + std::to_string(rank), "WORLD_SIZE=" + std::to_string(world),
                                  "LOCAL_RANK=" + std::to_string(rank), "MASTER_ADDR=127.0.0.1",
                                  "MASTER_PORT=" + std::to_string(port), "MDD_DIST_TIMEOUT_S=20",
                                  "MDD_DIST_CHILD=1", "OMP_NUM_THREADS=1"};
  env.insert(env.end(), extra.begin(), extra.end());
  const std::string arg = "--gtest_filter=" + filter;
  std::vector<char*> argv = {const_cast<char*>("/proc/self/exe"), const_cast<char*>(arg.c_str()), nullptr};
  std::vector<char*> envp;
  for (auto& e : env) envp.push_back(e.data());
  envp.push_back(nullptr);
  posix_spawn_file_actions_t quiet;
  posix_spawn_file_actions_init(&quiet);
  posix_spawn_file_actions_addopen(&quiet, 1, "/dev/null", O_WRONLY, 0);
  pid_t pid = 0;
  const int rc = ::posix_spawn(&pid, "/proc/self/exe", &quiet, nullptr, argv.data(), envp.data());
  posix_spawn_file_actions_destroy(&quiet);
  return rc == 0 ? pid : -1;
}

/// Waits for a child with a deadline (a hang must fail the test, not the CI's global timeout);
/// returns its exit code, 128 + signal, or -1 when it had to be killed.
inline int wait_child(pid_t pid, double seconds) {
  const auto t0 = std::chrono::steady_clock::now();
  int status = 0;
  while (::waitpid(pid, &status, WNOHANG) == 0) {
    if (std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() > seconds) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, &status, 0);
      return -1;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + (WIFSIGNALED(status) ? WTERMSIG(status) : 0);
}

}  // namespace mdd_test
