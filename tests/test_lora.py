"""LoRA adapter affinity in the mesh: the load signal, the spec, identity and the scorer.

vLLM names the adapters with running and waiting requests in the labels of
``vllm:lora_requests_info`` (and keeps earlier label sets, older timestamps as values); the load
monitor reads the newest into ``EndpointLoad.adapters``/``max_adapters``. A spec's model version
declares the adapters clients may name as ``model``; the mesh routes them to the base model and
the ``lora-affinity`` scorer prefers replicas where the adapter is active, then those with a free
adapter slot. The end-to-end test through real Envoy is tests/test_e2e_lora.py.
"""

from __future__ import annotations

from controlplane.load.metrics_parsing import EngineLoad, parse_engine_load
from controlplane.load.monitor import LoadMonitor, ScrapeTarget
from fleet import FleetConfig, ReplicaConfig, start_fleet

VLLM_LORA = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="llama"} 3.0
# HELP vllm:lora_requests_info Running stats on lora requests.
# TYPE vllm:lora_requests_info gauge
vllm:lora_requests_info{max_lora="2",running_lora_adapters="",waiting_lora_adapters=""} 1.7598e+09
vllm:lora_requests_info{max_lora="2",running_lora_adapters="sql,chat",waiting_lora_adapters="fin,sql"} 1.7599e+09
vllm:lora_requests_info{max_lora="2",running_lora_adapters="chat",waiting_lora_adapters=""} 1.75985e+09
"""


# ---- the load signal --------------------------------------------------------------------------


def test_the_newest_lora_info_names_the_active_adapters_running_first():
    load = parse_engine_load(VLLM_LORA, "vllm")
    assert load.adapters == ("sql", "chat", "fin")  # running, then waiting; once each
    assert load.max_adapters == 2
    assert load.running == 3.0
    assert parse_engine_load(VLLM_LORA, "generic") == load  # generic probes vLLM first


def test_without_lora_info_no_adapters_are_known():
    assert parse_engine_load("vllm:num_requests_running 1\n", "vllm") == EngineLoad(running=1.0)
    # Other engines' pages are not read for vLLM's names.
    assert parse_engine_load(VLLM_LORA, "sglang").adapters == ()
    idle = VLLM_LORA.replace("1.7599e+09", "1.7e+09").replace("1.75985e+09", "1.71e+09")
    assert parse_engine_load(idle, "vllm").adapters == ()  # the newest says none is active
    odd = 'vllm:lora_requests_info{max_lora="",running_lora_adapters=" a , ,b"} 1.0\n'
    assert parse_engine_load(odd, "vllm") == EngineLoad(adapters=("a", "b"), max_adapters=0)


async def test_the_load_monitor_reports_a_replicas_active_adapters():
    fleet = await start_fleet(
        FleetConfig(
            replicas=[
                ReplicaConfig(
                    name="lora",
                    address="127.0.0.1:0",
                    models=["llama"],
                    adapters=["sql-lora"],
                    overrides={"max_loras": 3},
                )
            ]
        )
    )
    try:
        engine = fleet.engine("lora")
        seq = engine.submit("llama", 8, [], 100_000 // 20, adapter="sql-lora")
        address = fleet.addresses["lora"]
        async with LoadMonitor([ScrapeTarget(address, "vllm")], interval_s=0.05) as monitor:
            report = await monitor.wait_for_report()
            while not report.endpoints or not report.endpoints[0].adapters:
                report = await monitor.wait_for_report(report.sequence, timeout=30)
        engine.abort(seq)
    finally:
        await fleet.stop()
    (endpoint,) = report.endpoints
    assert (list(endpoint.adapters), endpoint.max_adapters) == (["sql-lora"], 3)
