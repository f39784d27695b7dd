"""The result store (``MAAS_RESULT_BACKEND``): key names, claims, results, audit, Lua."""
