#!/bin/bash
# server CPU us per handshake: full vs resumed, TLS1.2 vs 1.3 (openssl s_time on CPU1, server on CPU0)
PY=/work/main/.venv/bin/python; HZ=$(getconf CLK_TCK)
cpu() { awk '{print $14+$15}' /proc/$1/stat; }
st() { # name pid port args
  local name=$1 pid=$2 port=$3; shift 3
  c0=$(cpu $pid)
  out=$(taskset -c 1 openssl s_time -connect 127.0.0.1:$port -time 4 "$@" 2>&1)
  c1=$(cpu $pid)
  n=$(echo "$out" | awk '/connections in [0-9.]+ real/{print $1; exit}')
  rate=$(echo "$out" | awk '/connections\/user sec/{print $NF; exit}')
  awk -v a=$c0 -v b=$c1 -v n=$n -v hz=$HZ -v name="$name" 'BEGIN{printf "%-34s %6d conns  server CPU %6.1f us/conn\n", name, n, (b-a)/hz*1e6/n}'
}
LIFETIME=300 taskset -c 0 $PY bench_server.py uvloop 1 18600 >/dev/null & SP=$!
sleep 1.5
for v in -tls1_2 -tls1_3; do for m in -new -reuse; do st "uvloop $v $m" $SP 18600 $v $m; done; done
kill $SP; wait $SP 2>/dev/null
LIFETIME=300 taskset -c 0 $PY bench_server.py asyncio 1 18600 >/dev/null & SP=$!
sleep 1.5
for v in -tls1_2 -tls1_3; do for m in -new -reuse; do st "asyncio $v $m" $SP 18600 $v $m; done; done
kill $SP; wait $SP 2>/dev/null
taskset -c 0 haproxy -f haproxy.cfg -db > /tmp/tlsexp/haproxy.out 2>&1 & HP=$!
sleep 1
for v in -tls1_2 -tls1_3; do for m in -new -reuse; do st "haproxy $v $m" $HP 18543 $v $m; done; done
kill $HP; wait $HP 2>/dev/null
