"""What to do with a pull request, and when.

- ``service``: :class:`~worker.pulls.service.PullService`, from a request to its one answer
- ``answers``: each request's waiter, and the count of requests in hand
- ``in_flight``: one pull per image, the requests waiting on it; ``slots``: the two lanes
- ``retry``: how often, how long between; ``registry_health``: bad registries, missing images
- ``owed``: pulls owed since the store was away; ``image_guard``: answers and prunes never cross
- ``observers``: hooks for whoever watches the outcomes (metrics, the usage log)
"""
