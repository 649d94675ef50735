"""GPU diagnosis: does LONGSEQ_DUO_MEMORY=1 split SmolLM2's layers under vLLM 0.26 (test kwargs)?"""
import json, os, sys, tempfile
sys.path.insert(0, "tests/support")
from engine_utils import write_one_streaming_head_pattern
tmp = tempfile.mkdtemp()
pattern = write_one_streaming_head_pattern(os.path.join(tmp, "pattern"))
os.environ.update({"LONGSEQ_ATTENTION": "duo", "LONGSEQ_DUO_PATTERN": pattern, "LONGSEQ_DUO_SPARSITY": str(1/3),
                   "LONGSEQ_DUO_MEMORY": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
eager = sys.argv[1] == "eager"
from longseq.config import get_config
print("DIAG config duo_memory", get_config().duo_memory, flush=True)
from vllm import LLM, ModelRegistry
kw = {"dtype": "bfloat16", "max_model_len": 4096, "enable_prefix_caching": True, "seed": 0,
      "gpu_memory_utilization": 0.3, "max_num_seqs": 16, "attention_config": {"backend": "CUSTOM"}}
if eager:
    kw["enforce_eager"] = True
else:
    kw.update(enforce_eager=False, compilation_config={"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY"})
llm = LLM(model=os.environ["LONGSEQ_TEST_MODEL"], **kw)
print("DIAG registry", ModelRegistry.models.get("LlamaForCausalLM"), flush=True)
print("DIAG archs", llm.llm_engine.vllm_config.model_config.architectures, flush=True)
try:
    print("DIAG model", llm.apply_model(lambda m: (type(m).__module__, type(m).__name__,
                                                   type(m.model.layers[0].self_attn.attn).__name__)), flush=True)
except Exception as e:
    print("DIAG apply_model failed", repr(e), flush=True)
print("DIAG blocks", llm.llm_engine.vllm_config.cache_config.num_gpu_blocks, flush=True)
print("DIAG hybrid off", llm.llm_engine.vllm_config.scheduler_config.disable_hybrid_kv_cache_manager, flush=True)
try:
    core = llm.llm_engine.engine_core.engine_core
    print("DIAG kv groups", [(type(g.kv_cache_spec).__name__, len(g.layer_names)) for g in core.scheduler.kv_cache_config.kv_cache_groups], core.scheduler.kv_cache_config.num_blocks, flush=True)
except Exception as e:
    print("DIAG groups failed", repr(e), flush=True)
