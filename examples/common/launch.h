#pragma once
// `--nproc N` of the pipeline programs (not part of the library): the program re-executes itself as
// N local ranks over loopback (torchrun's environment: RANK, WORLD_SIZE, LOCAL_RANK,
// LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and waits for them. Under torchrun or srun the
// launcher's environment is used as it is and `--nproc` must stay 1.
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

extern char** environ;

namespace mdd_examples {

/// True when a launcher (torchrun, srun, or our own --nproc) started this process as one rank.
inline bool launched_as_rank() { return std::getenv("RANK") || std::getenv("SLURM_PROCID"); }

/// Intra-op threads for one of the ranks on this node when none were asked for: the cores shared
/// among LOCAL_WORLD_SIZE ranks (LibTorch's default, all cores in every rank, would oversubscribe).
inline int64_t threads_per_local_rank() {
  const char* lws = std::getenv("LOCAL_WORLD_SIZE");
  const int local = lws ? std::max(1, std::atoi(lws)) : 1;
  return std::max<int64_t>(1, int64_t(std::thread::hardware_concurrency()) / local);
}

/// A loopback TCP port that was free a moment ago (rank 0's rendezvous store binds it next).
inline int free_loopback_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(a);
  int port = 0;
  if (fd >= 0 && ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0 &&
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) == 0)
    port = ntohs(a.sin_port);
  if (fd >= 0) ::close(fd);
  return port;
}

/// Runs `nproc` copies of this program (same arguments) as ranks 0..nproc-1 and returns the exit
/// code to use: 0 when all succeeded, else the first failing rank's code. A rank that fails makes
/// the others fail within their collective timeout; any still running 60 s later are stopped.
inline int launch_local_ranks(int nproc, char** argv, const char* program) {
  const int port = free_loopback_port();
  if (port <= 0) {
    std::fprintf(stderr, "%s: error: no free loopback port for the rendezvous\n", program);
    return 1;
  }
  std::vector<pid_t> pids;
  for (int r = 0; r < nproc; ++r) {
    std::vector<std::string> env;
    for (char** e = environ; *e; ++e) env.emplace_back(*e);
    for (std::string kv : {"RANK=" + std::to_string(r), "WORLD_SIZE=" + std::to_string(nproc), "LOCAL_RANK=" + std::to_string(r),
                           "LOCAL_WORLD_SIZE=" + std::to_string(nproc), std::string("MASTER_ADDR=127.0.0.1"),
                           "MASTER_PORT=" + std::to_string(port)})
      env.push_back(kv);
    std::vector<char*> envp;
    for (auto& e : env) envp.push_back(e.data());
    envp.push_back(nullptr);
    pid_t pid = 0;
    if (::posix_spawn(&pid, "/proc/self/exe", nullptr, nullptr, argv, envp.data()) != 0) {
      std::fprintf(stderr, "%s: error: could not start rank %d\n", program, r);
      for (pid_t p : pids) ::kill(p, SIGTERM);
      for (pid_t p : pids) ::waitpid(p, nullptr, 0);
      return 1;
    }
    pids.push_back(pid);
  }
  int result = 0;
  size_t alive = pids.size();
  std::vector<bool> done(pids.size(), false);
  auto failed_at = std::chrono::steady_clock::time_point::max();
  while (alive > 0) {
    for (size_t i = 0; i < pids.size(); ++i) {
      if (done[i]) continue;
      int status = 0;
      if (::waitpid(pids[i], &status, WNOHANG) != pids[i]) continue;
      done[i] = true;
      --alive;
      const int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + (WIFSIGNALED(status) ? WTERMSIG(status) : 0);
      if (code != 0 && result == 0) {
        result = code;
        failed_at = std::chrono::steady_clock::now();
        std::fprintf(stderr, "%s: rank %zu exited with code %d; waiting for the others to stop\n", program, i, code);
      }
    }
    if (alive > 0 && std::chrono::steady_clock::now() - failed_at > std::chrono::seconds(60)) {
      for (size_t i = 0; i < pids.size(); ++i)
        if (!done[i]) ::kill(pids[i], SIGTERM);
      failed_at = std::chrono::steady_clock::time_point::max();
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return result;
}

}  // namespace mdd_examples
