"""Benchmarks (`python -m gptoss_hpc.bench {submit,train,status}`): speed lives here, never in tests."""
