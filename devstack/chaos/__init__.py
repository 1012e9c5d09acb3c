"""The chaos suite: seeded fault schedules on a real stack, and an invariant
checker over what was recorded (issue 12).

- :mod:`devstack.chaos.schedule` turns a seed into a schedule of nemeses and
  client operations (pure);
- :mod:`devstack.chaos.runner` starts the stack (3-member etcd, mosquitto,
  HAProxy, BIND, one daemon per region, each reaching etcd through its own
  partitionable relay), plays the schedule while sampling the resources, lets
  the faults heal and collects a :class:`~devstack.chaos.checker.Record`;
- :mod:`devstack.chaos.checker` judges a record against the invariants (pure).

``tests/test_chaos.py`` runs a short seeded set in the test command;
``bench/run --only chaos --schedules N`` runs the long one.
"""
