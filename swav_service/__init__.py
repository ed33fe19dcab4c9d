"""What the API and the workers share, owned by neither: the service's common layer.

`settings` (SWAV_* variables), `db` (engine and sessions), `models` (the tables),
`job_state` (job state changes and their event log), `storage` (the artifacts folder and
the optional S3 store), `layout` (where files live under the artifacts folder) and
`dispatch` (task names, queues, the Celery configuration and a producer that sends work).

`api/` and `worker/` both import this package and never each other, so the API can be
deployed, imported and tested without the worker's code, and the workers without the web
layer. It imports neither of them, nor the engine (`swav_core`), nor torch: the API
process stays light, and the contracts in pyproject.toml (`lint-imports`) keep it so.
"""
