"""Task registry: a task connects data, a model family and a loss; the trainer only sees tasks."""

TASKS = {}


def register_task(name):
    def wrap(cls):
        TASKS[name] = cls
        return cls

    return wrap


from pretrain.tasks import distill, lm, translation  # noqa: E402,F401  (registration side effect)
