"""Webhooks: the terminal task object POSTed to the task's `callback_url`, signed.

- `dispatcher`: the loop that claims due deliveries from the database, POSTs them, records each
  attempt and schedules the next one with backoff. Runs in `serve` and `worker` processes alike.
- `deadline`: one overall deadline per attempt (DNS, connect, send, the answer's head).

The pure helpers it uses are leaves of their own: `cogview_api.signing` (the Standard Webhooks
scheme: per-key `whsec_` secrets, `v1,` HMAC-SHA256 signatures) and `cogview_api.addresses`
(which targets a callback may reach: no loopback, private, link-local... unless the operator
allows them), checked at submit and again at every delivery.

A delivery row is written in the same transaction that settles the task (store/tasks.py), so a
crash cannot lose it; the dispatcher only ever reads and updates those rows.
"""
