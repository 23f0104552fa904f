"""Benchmarks, each run as ``python -m benchmarks.<name>`` against the local stack.

Ray reads its auth mode when it is first imported, and every benchmark imports it: the
package sets the stack's Ray auth environment (mode and token file) before that.
"""

from cluster import local_secrets
from cluster.settings import load_settings

local_secrets.export_ray_environment(load_settings())
