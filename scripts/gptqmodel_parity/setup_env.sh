#!/bin/bash
# Scratch env: torch 2.13.0+cpu, transformers 4.57.6, peft 0.21.2 + gptqmodel 7.0.0 (no-deps, 2 small patches) + optimum 2.3.0
set -euo pipefail
V=${1:-/tmp/gptqenv_c}
python3.11 -m venv $V
timeout 300 $V/bin/pip install -q --upgrade pip
printf "torch==2.13.0+cpu\ntransformers==4.57.6\npeft==0.21.2\n" > /tmp/gptq_constraints.txt
timeout 900 $V/bin/pip install -q -c /tmp/gptq_constraints.txt torch==2.13.0 transformers==4.57.6 peft==0.21.2 safetensors accelerate optimum==2.3.0
# gptqmodel 7.0.0 runtime deps minus transformers>=5.4.0 (metadata conflict); pure-python sdist, no build step
timeout 900 $V/bin/pip install -q -c /tmp/gptq_constraints.txt "numpy==2.2.6" "threadpoolctl>=3.6.0" "device-smi>=0.5.5" "protobuf>=7.34.0" "pillow>=11.3.0" "pypcre>=0.3.2" "tokenicer>=0.0.13" "logbar>=0.4.3" "ninja>=1.13.0" "maturin>=1.9.4" "datasets>=3.6.0" "pyarrow>=21.0" "dill>=0.3.8" "torchao>=0.16.0" "defuser>=0.0.20"
timeout 600 $V/bin/pip install -q --no-deps gptqmodel==7.0.0
SP=$($V/bin/python -c "import sysconfig;print(sysconfig.get_paths()['purelib'])")
# patch 1: transformers 4.57 has no hub_kernels.lazy_load_kernel
$V/bin/python - "$SP" <<'PY'
import sys; sp=sys.argv[1]
p=f"{sp}/gptqmodel/__init__.py"; s=open(p).read()
a="        original_lazy_load_kernel = hub_kernels.lazy_load_kernel\n"
assert a in s; s=s.replace(a,"        if not hasattr(hub_kernels, 'lazy_load_kernel'):\n            return\n"+a,1); open(p,"w").write(s)
# patch 2: PreTrainedConfig is the transformers-5 spelling of PretrainedConfig
p=f"{sp}/gptqmodel/utils/hf.py"; s=open(p).read()
a="    PreTrainedConfig,\n"; assert a in s; s=s.replace(a,"    PretrainedConfig as PreTrainedConfig,\n",1); open(p,"w").write(s)
PY
# stub: gptqmodel imports torchvision.transforms(.functional.InterpolationMode) at import time (internvl_chat);
# PyPI's torchvision 0.28.0 is a CUDA build that breaks transformers on torch 2.13.0+cpu, so stub it (no dist-info => transformers ignores it)
mkdir -p $SP/../tvstub/torchvision/transforms
: > $SP/../tvstub/torchvision/__init__.py
printf 'class InterpolationMode:\n    BICUBIC = "bicubic"\n    BILINEAR = "bilinear"\n' > $SP/../tvstub/torchvision/transforms/functional.py
echo "from .functional import InterpolationMode" > $SP/../tvstub/torchvision/transforms/__init__.py
echo "$(cd $SP/../tvstub && pwd)" > $SP/zz_tvstub.pth
$V/bin/python -c "import gptqmodel, peft.import_utils as u; print('gptqmodel', gptqmodel.__version__, 'peft sees gptqmodel:', u.is_gptqmodel_available())" 2>&1 | tail -1
