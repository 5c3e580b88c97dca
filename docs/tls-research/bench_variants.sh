#!/bin/bash
# new-connection cost (wrk -H 'Connection: close') and keep-alive cost for variants of the uvloop TLS server
D=${D:-5}; R=${R:-3}; PY=/work/main/.venv/bin/python; HZ=$(getconf CLK_TCK)
cpu() { awk '{print $14+$15}' /proc/$1/stat; }
run() { local name=$1 pid=$2; shift 2; local cs=() rs=()
  for i in $(seq $R); do c0=$(cpu $pid); out=$(taskset -c 1 wrk -t1 -c50 -d${D}s "$@" 2>&1); c1=$(cpu $pid)
    n=$(echo "$out" | awk '/requests in/{print $1}'); rs+=($(echo "$out" | awk '/Requests\/sec/{printf "%d", $2}'))
    cs+=($(awk -v a=$c0 -v b=$c1 -v n=$n -v hz=$HZ 'BEGIN{printf "%.1f", (b-a)/hz*1e6/n}')); done
  m=$(( (R+1)/2 ))
  printf "%-36s server CPU us/req med %6s (%s)  req/s med %s\n" "$name" "$(printf "%s\n" "${cs[@]}" | sort -n | sed -n ${m}p)" "${cs[*]}" "$(printf "%s\n" "${rs[@]}" | sort -n | sed -n ${m}p)"; }
for v in "base:" "TICKET=key:" "TICKET=ring:" "COUNTING=1:" "NO_TICKET=1:"; do
  name=${v%%:*}; envs=${v%:}; [ "$name" = base ] && envs=""
  env $envs LIFETIME=600 taskset -c 0 $PY bench_server.py ${LOOP:-uvloop} 1 18600 >/dev/null & SP=$!; sleep 1.5
  run "${LOOP:-uvloop} $name new-conn" $SP https://127.0.0.1:18600/ -H "Connection: close"
  [ "$name" = COUNTING ] && run "${LOOP:-uvloop} $name keepalive" $SP https://127.0.0.1:18600/
  kill $SP; wait $SP 2>/dev/null
done
