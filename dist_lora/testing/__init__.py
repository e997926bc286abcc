"""Test helpers: the multi-process harness and single-device Hugging Face references."""

from dist_lora.testing.multiprocess import Context, check, distributed_tests, launch

__all__ = ["Context", "check", "distributed_tests", "launch"]
