"""Many processes and memory: ranks and sharding, launching, the memory calculator, the allocator."""
