# Image I/O + preprocessing (io/image.h) and the data area (Fashion-MNIST, ImageFolder, LatentCache, loader).
mdd_add_test(test_data SOURCES test_image.cpp test_data.cpp AREAS util io data)
