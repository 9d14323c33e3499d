"""The OpenAI-compatible server (``aurora serve``).

app.py (create_app, lifecycle) · openai_routes.py (/v1/*) · requests.py (body -> engine inputs) ·
bridge.py (engine thread <-> asyncio, admission) · text.py (detokenization, stop strings) ·
protocol.py (request/response models) · errors.py · security.py (keys, body limit) ·
metrics.py (/metrics) · telemetry.py (request records, JSON logs) · live.py + live.html (GET /) ·
admin.py (/admin/*) · cli.py (``aurora serve``) · testing.py (in-thread server, Chromium render).
"""
