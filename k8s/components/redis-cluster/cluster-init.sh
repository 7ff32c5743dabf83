#!/bin/sh
# Forms the Redis Cluster once every node answers, and only then; run by the
# Job redis-cluster-init (and on loopback by scripts/check-deploy.sh).
#
#   CLUSTER_NODES        "host:port host:port ..." every node, primaries and replicas
#   CLUSTER_REPLICAS     replicas per primary (1: 6 nodes = 3 primaries + 3 replicas)
#   REDIS_PASSWORD_FILE  the password file of the mounted Secret
#   WAIT_SECONDS         how long to wait for every node to answer (600)
#
# Idempotent. On nodes that know nothing of each other and own no slots it runs
# `redis-cli --cluster create`. On a formed cluster it creates nothing: it
# introduces every node to every other at its current address (CLUSTER MEET;
# after all pods restarted at once they come back with new IPs and would not
# find each other), makes a node that came back empty (a lost volume) the
# replica of the primary with the fewest replicas, and checks the result.
# Exit status 0 only when every slot is served and every node agrees.
set -eu

: "${CLUSTER_NODES:?CLUSTER_NODES: the nodes, host:port separated by spaces}"
REPLICAS=${CLUSTER_REPLICAS:-1}
WAIT=${WAIT_SECONDS:-600}
# redis-cli reads the password from REDISCLI_AUTH: never an argument (ps shows those).
REDISCLI_AUTH=$(cat "${REDIS_PASSWORD_FILE:?REDIS_PASSWORD_FILE: the password file}")
export REDISCLI_AUTH

host() { echo "${1%:*}"; }
port() { echo "${1##*:}"; }
cli() { # host:port command...
    _addr=$1
    shift
    redis-cli -h "$(host "$_addr")" -p "$(port "$_addr")" "$@"
}
# One field of CLUSTER INFO (its lines end in CR LF).
info_field() { # host:port field
    cli "$1" cluster info | tr -d '\r' | sed -n "s/^$2://p"
}
# The node's address as CLUSTER MEET and --cluster create want it: an IP.
ip_of() { # host
    case $1 in
        *[!0-9.]*) getent hosts "$1" | awk '{ print $1; exit }' ;;
        *) echo "$1" ;;
    esac
}

echo "waiting for $CLUSTER_NODES (up to ${WAIT}s)"
deadline=$(($(date +%s) + WAIT))
for node in $CLUSTER_NODES; do
    until [ "$(cli "$node" ping 2>/dev/null)" = PONG ]; do
        if [ "$(date +%s)" -ge "$deadline" ]; then
            echo "$node does not answer PING after ${WAIT}s" >&2
            exit 1
        fi
        sleep 2
    done
done

addrs="" formed="" fresh=""
for node in $CLUSTER_NODES; do
    ip=$(ip_of "$(host "$node")")
    [ -n "$ip" ] || { echo "cannot resolve $(host "$node")" >&2; exit 1; }
    addrs="$addrs $ip:$(port "$node")"
    if [ "$(info_field "$node" cluster_known_nodes)" = 1 ] && [ "$(info_field "$node" cluster_slots_assigned)" = 0 ]; then
        fresh="$fresh $node"
    else
        formed="$formed $node"
    fi
done

# Waits until every slot is served on every node given (a failover or a
# reconnection settles within seconds of the node timeout).
wait_slots_ok() { # nodes...
    for node in "$@"; do
        until [ "$(info_field "$node" cluster_state)" = ok ] &&
            [ "$(info_field "$node" cluster_slots_ok)" = 16384 ]; do
            if [ "$(date +%s)" -ge "$deadline" ]; then
                echo "$node: not every slot is served after ${WAIT}s:" >&2
                cli "$node" cluster info | tr -d '\r' | grep -E '^cluster_(state|slots)' >&2
                exit 1
            fi
            sleep 1
        done
    done
}

if [ -z "$formed" ]; then
    echo "no node is part of a cluster: creating it with $REPLICAS replica(s) per primary"
    # shellcheck disable=SC2086 # one argument per node
    redis-cli --cluster create $addrs --cluster-replicas "$REPLICAS" --cluster-yes
else
    echo "cluster already formed (nodes:$formed); not creating it"
    # Introduce the cluster's nodes to each other at their current addresses.
    # Empty nodes join only later: one that took a lost node's address would
    # leave that node without an address, and such a node is never failed over.
    for node in $formed; do
        self=$(ip_of "$(host "$node")"):$(port "$node")
        for other in $formed; do
            addr=$(ip_of "$(host "$other")"):$(port "$other")
            [ "$addr" = "$self" ] || cli "$node" cluster meet "${addr%:*}" "${addr##*:}" >/dev/null
        done
    done
    # shellcheck disable=SC2086
    set -- $formed
    ref=$1
    # Nodes the cluster remembers but no pod is any more (a pod that lost its
    # volume came back as a new node): forget them everywhere, once none of
    # them owns slots (a lost primary's replica takes over after the node
    # timeout; forgetting the primary before would leave its slots unserved).
    live=""
    for node in $CLUSTER_NODES; do live="$live $(cli "$node" cluster myid)"; done
    gone() { # prints "id slot-ranges" of every node no pod holds
        cli "$ref" cluster nodes | awk -v live="$live" '
            BEGIN { n = split(live, ids, " "); for (i = 1; i <= n; i++) alive[ids[i]] = 1 }
            !($1 in alive) { print $1, NF - 8 }'
    }
    while gone | awk '$2 > 0 { found = 1 } END { exit !found }'; do
        if [ "$(date +%s)" -ge "$deadline" ]; then
            echo "nodes no pod holds still own slots (their replicas did not take over):" >&2
            gone >&2
            exit 1
        fi
        # A new node that took a lost primary's address leaves that primary
        # "noaddr", which Redis never fails over by itself: promote its replica.
        cli "$ref" cluster nodes | awk -v live="$live" '
            BEGIN { n = split(live, ids, " "); for (i = 1; i <= n; i++) alive[ids[i]] = 1 }
            !($1 in alive) && $3 ~ /noaddr/ && NF > 8 { lost[$1] = 1 }
            $3 ~ /slave/ && $3 !~ /fail|noaddr/ { sub(/@.*/, "", $2); replica_of[$2] = $4 }
            END { for (r in replica_of) if (replica_of[r] in lost) print r }' |
            while read -r replica; do
                echo "promoting $replica: its primary is lost"
                cli "$replica" cluster failover force || true
            done
        sleep 1
    done
    # shellcheck disable=SC2086
    wait_slots_ok $formed
    for id in $(gone | awk '{ print $1 }'); do
        echo "forgetting node $id (no pod holds it)"
        for node in $CLUSTER_NODES; do cli "$node" cluster forget "$id" >/dev/null || true; done
    done
    for node in $fresh; do
        # Let the empty node in, then make it a replica of the primary with the
        # fewest replicas.
        addr=$(ip_of "$(host "$node")"):$(port "$node")
        cli "$ref" cluster meet "${addr%:*}" "${addr##*:}" >/dev/null
        primary=$(cli "$ref" cluster nodes | awk '
            { flags[$1] = $3; master[$1] = $4; slots[$1] = NF > 8 }
            END {
                for (id in flags) if (flags[id] ~ /master/ && flags[id] !~ /fail/ && slots[id]) n[id] = 0
                for (id in flags) if (flags[id] ~ /slave/ && flags[id] !~ /fail|noaddr/ && master[id] in n) n[master[id]]++
                for (id in n) print n[id], id
            }' | sort -n | awk '{ print $2; exit }')
        [ -n "$primary" ] || { echo "no primary serves slots" >&2; exit 1; }
        until cli "$node" cluster nodes | grep -q "^$primary "; do
            [ "$(date +%s)" -lt "$deadline" ] || { echo "$node does not learn of $primary" >&2; exit 1; }
            sleep 1
        done
        echo "$node came back empty: replica of $primary"
        cli "$node" cluster replicate "$primary"
    done
fi

# shellcheck disable=SC2086
wait_slots_ok $CLUSTER_NODES
# shellcheck disable=SC2086
set -- $CLUSTER_NODES
redis-cli --cluster check "$(ip_of "$(host "$1")"):$(port "$1")"
# --cluster check accepts a primary that serves nothing; this shape does not
# (a new replica's role reaches the other nodes by gossip, within seconds).
until idle=$(cli "$1" cluster nodes | awk '$3 ~ /master/ && NF <= 8 { print $2 }') && [ -z "$idle" ]; do
    [ "$(date +%s)" -lt "$deadline" ] || { echo "primaries that serve no slots: $idle" >&2; exit 1; }
    sleep 1
done
echo "cluster ok: every slot served, every primary with its replicas"
