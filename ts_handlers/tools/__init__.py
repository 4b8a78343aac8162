"""Tooling around the runtime: the build, a local TorchServe, the REST client, demo models.

Nothing here is imported by a serving worker, and ``--self-contained`` archives do not embed it.
"""
