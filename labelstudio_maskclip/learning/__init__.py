"""Learning from people: the masks annotators accept or correct (``store``, durable SQLite) and COCO
datasets written from them (``export``).
"""
