"""Wire protocols shared by the parties, apart from any one party's code.

:mod:`sealedml.protocol.keyservice` holds the KeyService's messages and the
exact bytes its calls and answers sign or seal; the KeyService, its clients
(owners, users) and runtimes all build the same bytes from it, and none of them
imports another's code to do so.
"""
