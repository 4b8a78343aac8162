"""Export-time code: each task's ``prepare_export`` and what the text tasks share.

A task's record (``ts_handlers.tasks.Task``) names its export by dotted path, so the build
imports these modules and a worker serving an archive never does.
"""
