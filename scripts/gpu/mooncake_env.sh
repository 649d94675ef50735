# Source ON the GPU machine after /tmp/lsq-bundle/env.sh, once mooncake_setup.sh printed MOONCAKE READY.
export PYTHONPATH=/tmp/site-mc${PYTHONPATH:+:$PYTHONPATH}
export LD_LIBRARY_PATH=/tmp/mc-libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export PATH=/tmp/site-mc/mooncake:$PATH
