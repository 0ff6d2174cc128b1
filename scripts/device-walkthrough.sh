#!/usr/bin/env bash
# A field technician's device, from the command line: create a store with the field-service
# schema, work offline (create, edit, delete), run "my active work orders", bulk-import, and
# look at the event log and the store's status. Runs in a temporary directory.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release -q -p fieldsync-node
fs=target/release/fieldsync
data=$(mktemp -d)/device
trap 'rm -rf "$(dirname "$data")"' EXIT
me=user:9a1f3c52-0000-4000-8000-000000000001
other=user:9a1f3c52-0000-4000-8000-000000000002

step() { printf '\n== %s\n' "$*"; }

step "init a device store"
$fs device init --data "$data" --schema examples/field-service/schema.toml

step "create an account and two work orders (offline: no hub needed)"
acct=$($fs device put --data "$data" account name="Contoso Pharmaceuticals" address1_city=Redmond ownerid=$me)
echo "account $acct"
wo1=$($fs device put --data "$data" msdyn_workorder msdyn_name=WO-0001 msdyn_serviceaccount="$acct" \
  msdyn_priority=2 msdyn_datewindowstart=2026-11-26T08:30:00Z ownerid=$me)
wo2=$($fs device put --data "$data" msdyn_workorder msdyn_name=WO-0002 ownerid=$other)
echo "work orders $wo1 $wo2"

step "edit one column of WO-0001"
$fs device put --data "$data" msdyn_workorder --id "$wo1" msdyn_workordersummary="Replace the filter"
$fs device get --data "$data" msdyn_workorder "$wo1"

step "my active work orders (an index scan on owner and statecode)"
$fs device query --data "$data" msdyn_workorder --where ownerid=$me --where statecode=0 --json

step "a wrong value is refused and nothing is written"
$fs device put --data "$data" msdyn_workorder msdyn_priority=urgent || true

step "bulk import 20,000 contacts"
contacts=$(dirname "$data")/contacts.jsonl
for i in $(seq 1 20000); do
  printf '{"firstname":"Tech%d","lastname":"Field","parentcustomerid":"%s","ownerid":"%s"}\n' "$i" "$acct" "$me"
done > "$contacts"
$fs device import --data "$data" contact "$contacts"

step "delete WO-0002 (a tombstone that will replicate)"
$fs device delete --data "$data" msdyn_workorder "$wo2"

step "the event log since seq 3"
$fs device log --data "$data" --since 3 | head -n 8

step "status"
$fs device status --data "$data"
