"""Many replicas on Ray Serve that change version together: the two-phase cutover.

Needs the `ray` extra (`pip install 'hotweights[ray]'`). Nothing outside this package
imports it; `hotweights fleet` imports it when it runs. `command`, `bridge`, `replica`,
`admissions`, `coordinator`, `admin_body`, `names` and `settings` do not import Ray.
"""
