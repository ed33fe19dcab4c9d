"""Request and response bodies: `XCreate` (input, unknown keys rejected), `XPublic`,
`XsPublic`; by resource in `common` (shared, health, backbones), `jobs` (jobs and their
events) and `artifacts` (datasets, checkpoints, embedding jobs, weights, usage).

Responses are built from rows with `from_row`, so what the API shows is chosen here and
not by whatever columns a model happens to have (leases, tenants and paths stay inside).
"""
