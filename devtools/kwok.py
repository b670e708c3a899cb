"""Pod annotations read by the KWOK Stages in testbed/stages/pod.yaml: how a simulated
runner pod ends on the test cluster (used by the tests, `simulated_runner` and the benches)."""

from __future__ import annotations

FATE = "testbed.dharma/fate"
DELAY = "testbed.dharma/delay"
EXIT_CODE = "testbed.dharma/exit-code"
MESSAGE = "testbed.dharma/message"
TERMINATION_DELAY = "testbed.dharma/termination-delay"
