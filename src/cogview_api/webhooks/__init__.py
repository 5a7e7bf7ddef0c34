"""Webhook delivery, a runtime part beside the worker: the terminal task object POSTed to the
task's `callback_url`, signed.

- `dispatcher`: the loop that claims due deliveries from the database, POSTs them, records each
  attempt and schedules the next one with backoff. Runs in `serve` and `worker` processes alike,
  started by `server.py`, which also hands it the payload renderer (the API's task object), so
  nothing here imports the HTTP layer.
- `deadline`: one overall deadline per attempt (DNS, connect, send, the answer's head).

The pure helpers it uses are leaves of their own: `cogview_api.signing` (the Standard Webhooks
scheme) and `cogview_api.addresses` (which targets a callback may reach, also checked at
submit).

A delivery row is written in the same transaction that settles the task (store/tasks.py), so a
crash cannot lose it; the dispatcher only ever reads and updates those rows.
"""
