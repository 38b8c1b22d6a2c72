"""Label Studio's formats: labeling configs (``labeling``), predicted regions (``regions``), the JSON on the
wire (``wire``), webhook and export payloads turned into stored masks (``webhooks``) and the REST client
(``api``). Translates Label Studio JSON to the engine's arrays and back; the engine never sees a task or a URL.
"""
