"""Sessions for attested programs (secureTF's CAS): versioned, k-of-n signed policy documents.

* :mod:`.document` — the document, its digest and signatures, update checks, and the bundle
  (arguments, environment, injected files, volume keys) a service receives.
* :mod:`.ca` — each session's certificate authority (kept in the KeyService) and the
  certificates it issues to services for the network shield.
* :mod:`.program` — the program's side: release a service's bundle, reach volume root tags.
* :mod:`.inject` — injected files and mounted volumes served from memory to the program.
* :mod:`.launcher` — ``sealedml run``: attest, receive, inject, forward, run, renew.

The KeyService's side is :mod:`sealedml.keyservice.sessions`.
"""
