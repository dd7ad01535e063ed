"""The load test a user runs against a gateway (`make loadtest`), and the launcher it starts one with.

* `run`: Locust headless against a gateway (started here, or a running one by --url), then the gates.
* `locustfile`, `payloads`: the Locust users and the request mix they send.
* `gates`: pass/fail over Locust's CSV files.
* `gateway_process`: gunicorn serving the gateway (or another app) on a free port, the way production
  does; the serving benchmark and the test suite's fault drills start their gateways with it too.
Needs the `load` extra (Locust, psutil).
"""
