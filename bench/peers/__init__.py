"""Drivers, load generator and report for `bench/reload_under_load.py`.

Every served system (hotweights with one swap policy, TorchServe, Seldon MLServer, Ray
Serve) is driven through the same `System` role: start serving version 1 of the benchmark
model, build one inference request, read back which version answered, make version N live
through the system's own reload mechanism, stop. The load generator and the report know
nothing else about a system.
"""
