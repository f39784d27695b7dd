"""The control plane: tenants and their keys, what each may run and how much, who may cancel.

Also the Redis ACL roles that bound what each process can touch (``acl``).
"""
