"""Learning from people: webhooks (``webhooks``) store the masks annotators accept or correct
(``store``, durable SQLite), ``trigger`` decides when to train, ``export`` writes COCO datasets.
"""
