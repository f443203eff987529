"""Many replicas on Ray Serve that change version together: the two-phase cutover, for
every base model of a repository.

Needs the `ray` extra (`pip install 'hotweights[ray]'`). Nothing outside this package
imports it; `hotweights fleet` imports it when it runs. Only `deployment` and `ingress`
import Ray (and `record_store`, lazily, for the `ray-kv` state).
"""
