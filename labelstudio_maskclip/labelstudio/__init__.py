"""The Label Studio adapter: labeling configs, task images, the ML backend protocol (``backend``,
``server``), the REST client and the bulk pre-annotation command. Translates Label Studio JSON to the
engine's arrays and back; the engine never sees a task or a URL.
"""
