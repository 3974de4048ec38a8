"""Host-side paged-KV bookkeeping: a ref-counted page allocator and a full-page prefix cache."""

from ferrum_jax.paging.allocator import PageAllocator
from ferrum_jax.paging.prefix_cache import PrefixCache, page_hashes

__all__ = ["PageAllocator", "PrefixCache", "page_hashes"]
