"""The scheduler loop's order of sends: a step's outputs leave after the next plan (the workers wait
for the plan, the frontend does not), in order, and never to a client that has left. No sockets or
worker processes: the loop runs over a scripted inbox and records what it sends."""

from collections import deque

from ipc.messages import ExecuteStep, RequestOutputs, Shutdown, StepResult
from ipc.sampling_params import SamplingParams
from scheduler_proc.core import SchedulerProc
from scheduler_proc.scheduler import Scheduler


class Recorder:
    def __init__(self, name: str, log: list) -> None:
        self.name, self.log = name, log

    def send(self, msg) -> None:
        self.log.append((self.name, msg))


class ScriptedInbox:
    """Each loop iteration's first recv gets the next entry (None: nothing arrived)."""

    def __init__(self, script: list) -> None:
        self.script = deque(script)

    def recv(self, timeout_ms=None):
        return self.script.popleft() if self.script else Shutdown()

    def recv_nowait(self):
        return None


def make_proc(script: list, log: list) -> SchedulerProc:
    proc = SchedulerProc.__new__(SchedulerProc)  # the loop and handlers alone, no __init__ sockets
    proc.scheduler = Scheduler(16, 4, 8, 64, 32, (99,))
    proc.inbox, proc.to_workers = ScriptedInbox(script), Recorder("workers", log)
    proc.clients = {0: Recorder("client0", log), 5: Recorder("client5", log)}
    proc.owner, proc.outbox = {}, []
    proc.steps_in_flight, proc.nothing_to_plan, proc.running = deque(), False, True
    proc.workers, proc.nodes = [], {}
    proc.handlers = {StepResult: proc._on_step_result, Shutdown: proc._on_shutdown}
    return proc


def add(proc: SchedulerProc, request_id: str, client_index: int) -> None:
    proc.scheduler.add_request(request_id, [1, 2, 3], SamplingParams(max_tokens=5))
    proc.owner[request_id] = client_index


def test_a_steps_outputs_are_sent_after_the_next_plan():
    log: list = []
    proc = make_proc([None, None, StepResult(1, ["a"], [[7]])], log)
    add(proc, "a", 0)
    proc.run()
    kinds = [(name, type(msg).__name__) for name, msg in log]
    assert kinds == [("workers", "ExecuteStep"), ("workers", "ExecuteStep"),  # steps 1 and 2 in flight
                     ("workers", "ExecuteStep"), ("client0", "RequestOutputs")]  # step 3, then step 1's token
    assert [msg.step_id for _, msg in log[:3] if isinstance(msg, ExecuteStep)] == [1, 2, 3]
    (delta,) = log[3][1].outputs
    assert (delta.request_id, delta.new_token_ids) == ("a", [7])


def test_outputs_keep_their_order_and_skip_a_client_that_left():
    log: list = []
    proc = make_proc([], log)
    add(proc, "a", 0)
    add(proc, "b", 5)
    proc.scheduler.schedule()
    proc._send_outputs(proc.scheduler.update(StepResult(1, ["a", "b"], [[7], [8]])), always=True)
    proc._send_outputs(proc.scheduler.abort(["a"]), always=True)
    del proc.clients[5]  # its ClientBye came in the same batch of messages
    proc._flush_outputs()
    assert [name for name, _ in log] == ["client0", "client0"]
    assert isinstance(log[0][1], RequestOutputs) and log[0][1].stats is not None
    assert [(d.new_token_ids, d.finish_reason) for _, msg in log for d in msg.outputs] == [([7], None), ([], "abort")]
    assert proc.outbox == []
