#!/bin/bash
PY=/work/main/.venv/bin/python; HZ=$(getconf CLK_TCK)
cpu() { awk '{print $14+$15}' /proc/$1/stat; }
meas() { local name=$1 pid=$2 port=$3; shift 3
  c0=$(cpu $pid); read n r < <(taskset -c 1 $PY resclient.py $port "$@" 4); c1=$(cpu $pid)
  awk -v a=$c0 -v b=$c1 -v n=$n -v r=$r -v hz=$HZ -v name="$name" 'BEGIN{printf "%-28s %6d conns (%d resumed)  server CPU %6.1f us/conn\n", name, n, r, (b-a)/hz*1e6/n}'; }
for loop in uvloop asyncio; do
  LIFETIME=300 taskset -c 0 $PY bench_server.py $loop 1 18600 >/dev/null & SP=$!; sleep 1.5
  for v in 12 13; do for m in new reuse; do meas "$loop tls$v $m" $SP 18600 $v $m; done; done
  kill $SP; wait $SP 2>/dev/null
done
taskset -c 0 haproxy -f haproxy.cfg -db > /tmp/tlsexp/haproxy.out 2>&1 & HP=$!; sleep 1
for v in 12 13; do for m in new reuse; do meas "haproxy tls$v $m" $HP 18543 $v $m; done; done
kill $HP; wait $HP 2>/dev/null
