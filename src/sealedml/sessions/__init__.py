"""Sessions for attested programs (secureTF's CAS): versioned, k-of-n signed policy documents.

* :mod:`.document` — the document, its digest and signatures, update checks, and the bundle
  (arguments, environment, injected files, volume keys) a service receives.
"""
