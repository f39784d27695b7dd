"""Private inference: workers evaluate models on CKKS-encrypted inputs (docs/private-inference.md).

An optional capability, the ``private`` extra (TenSEAL). The client encrypts each
input vector under its tenant's own CKKS secret key, which never leaves the client;
a job carries the ciphertext (sealed in the usual envelope) and the SHA-256 of the
tenant's public evaluation context, registered once in Redis; the worker evaluates
the model's affine layer on the ciphertext and returns a ciphertext only the client
can decrypt.

- `params`: the wire format and the parameter minimum (no TenSEAL, imported by both
  sides and by the default path);
- `ckks`: TenSEAL itself, loaded on first use with a one-line error without the extra:
  the client's secret context (`SecretContext`) and the worker's checked public one
  (`load_public`);
- `evaluate`: the worker's side: the affine layer of a signed model, the bounded
  context cache, the evaluation.

Nothing here imports TenSEAL at import time, so the default install and the default
path never load it.
"""
