# Sourced by the setup scripts: fail early, with the numbers, when the disk cannot hold what they install
# (a full disk mid-install leaves a half-built venv and pip's bare "[Errno 28] No space left on device").
#   need_disk DIR GB WHAT
need_disk() {
  local dir=$1 need_gb=$2 what=$3 free_kb
  while [ ! -d "$dir" ]; do dir=$(dirname "$dir"); done
  free_kb=$(df -Pk "$dir" | awk 'NR == 2 {print $4}')
  if [ -n "$free_kb" ] && [ "$free_kb" -lt $(( need_gb * 1024 * 1024 )) ]; then
    echo "longseq: $what needs about $need_gb GiB free in $dir, and only $(( free_kb / 1024 )) MiB are free." \
      "Free some space, or put the venv elsewhere (LONGSEQ_VENV / LONGSEQ_SGLANG_VENV), and run it again" >&2
    return 1
  fi
}
