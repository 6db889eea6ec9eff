"""The GPU speed paths, each off until measured: torch.compile with a cache under SPO_DATA_DIR and batch
buckets (`compiling`), float8 weights and activations through torchao (`fp8`), and the scaled-dot-product
attention backend measured at start (`attention`). Functions over torch modules; nothing here knows the
pipeline."""
