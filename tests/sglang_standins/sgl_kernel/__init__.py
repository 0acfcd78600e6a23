"""Stand-in for ``sgl_kernel`` (CUDA-only on PyPI) so that SGLang's CPU engine can start.

Defines only the names sglang imports at module import time; each raises NotImplementedError
when called, so it can never fake a result. See tests/sglang_standins/README.md.
"""

_NAMES = (
    "assign_draft_cache_locs_contiguous_cpu",
    "assign_extend_cache_locs_cpu",
    "assign_req_to_token_pool_cpu",
    "build_tree_kernel_efficient_cpu",
    "copy_all_layer_kv_cache_cpu",
    "fill_accept_out_cache_loc_cpu",
    "fill_bonus_tokens_cpu",
    "verify_tree_greedy_cpu",
)


def _unavailable(name: str):
    def kernel(*args, **kwargs):
        raise NotImplementedError(f"sgl_kernel.{name} is a stand-in: the CUDA kernel package is not installed")

    kernel.__name__ = kernel.__qualname__ = name
    return kernel


for _name in _NAMES:
    globals()[_name] = _unavailable(_name)
