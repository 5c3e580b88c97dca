#!/bin/bash
# usage: bench.sh DURATION REPS
# Server pinned to CPU0, wrk pinned to CPU1 (1 thread, 50 conns). The machine is shared with other
# sessions, so besides req/s we report server CPU microseconds per request (utime+stime delta of
# the server process / requests done), which is far less sensitive to contention.
D=${1:-5}; R=${2:-3}
PY=/work/main/.venv/bin/python
HZ=$(getconf CLK_TCK)
cpu() { awk '{print $14+$15}' /proc/$1/stat; }
run() { # name pid url extra-wrk-args...
  local name=$1 pid=$2 url=$3; shift 3; local rs=() cs=()
  for i in $(seq $R); do
    c0=$(cpu $pid)
    out=$(taskset -c 1 wrk -t1 -c50 -d${D}s "$@" "$url" 2>&1)
    c1=$(cpu $pid)
    n=$(echo "$out" | awk '/requests in/{print $1}')
    rs+=($(echo "$out" | awk '/Requests\/sec/{printf "%d", $2}'))
    cs+=($(awk -v a=$c0 -v b=$c1 -v n=$n -v hz=$HZ 'BEGIN{printf "%.1f", (b-a)/hz*1e6/n}'))
    e=$(echo "$out" | grep -E "errors|Non-2xx"); [ -n "$e" ] && echo "   $e"
  done
  m=$(( (R+1)/2 ))
  printf "%-28s req/s med %6s (%s)   server CPU us/req med %6s (%s)\n" "$name" \
    "$(printf "%s\n" "${rs[@]}" | sort -n | sed -n ${m}p)" "${rs[*]}" "$(printf "%s\n" "${cs[@]}" | sort -n | sed -n ${m}p)" "${cs[*]}"
}
for loop in ${LOOPS:-asyncio uvloop}; do
  for tls in 0 1; do
    LIFETIME=600 taskset -c 0 $PY bench_server.py $loop $tls 18600 > /tmp/tlsexp/srv.out & SP=$!
    sleep 1.5
    scheme=http; [ $tls = 1 ] && scheme=https
    run "$loop tls=$tls keepalive" $SP $scheme://127.0.0.1:18600/
    [ $tls = 1 ] && run "$loop tls=1 new-conn" $SP $scheme://127.0.0.1:18600/ -H "Connection: close"
    kill $SP; wait $SP 2>/dev/null
  done
done
[ -n "$NOHAPROXY" ] && exit 0
taskset -c 0 haproxy -f haproxy.cfg -db > /tmp/tlsexp/haproxy.out 2>&1 & HP=$!
sleep 1
run "haproxy plain keepalive" $HP http://127.0.0.1:18580/
run "haproxy tls keepalive" $HP https://127.0.0.1:18543/
run "haproxy tls new-conn" $HP https://127.0.0.1:18543/ -H "Connection: close"
kill $HP; wait $HP 2>/dev/null
