package snat

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestExecRunner drives the real exec path against stand-in binaries: the
// payload goes to iptables-restore --noflush -w on stdin, once per family,
// and its stderr ends up in the error. Without nft on the PATH, auto
// selects iptables-legacy (and there is no fence).
func TestExecRunner(t *testing.T) {
	dir := t.TempDir()
	script := func(name, body string) {
		t.Helper()
		if err := os.WriteFile(filepath.Join(dir, name), []byte("#!/bin/sh\n"+body+"\n"), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for _, ipt := range []string{"iptables-legacy", "ip6tables-legacy"} {
		script(ipt, `case "$*" in *--version*) echo "iptables v1.8.9 (legacy)";; *) echo "-P POSTROUTING ACCEPT";; esac`)
		script(ipt+"-save", `printf '*nat\n:POSTROUTING ACCEPT [0:0]\nCOMMIT\n'`)
		script(ipt+"-restore", `echo "$@" > `+dir+`/`+ipt+`.args; /bin/cat >> `+dir+`/`+ipt+`.stdin
echo "iptables-restore: line 3 failed" >&2; exit 1`)
	}
	t.Setenv("PATH", dir)
	m, err := New(Config{})
	if err != nil {
		t.Fatal(err)
	}
	failed, err := m.Apply(t.Context(), dualStack(udp5060))
	if err == nil || failed != nil || strings.Count(err.Error(), "line 3 failed") != 2 {
		t.Fatalf("Apply = %v, %v; want the restore stderr of both families", failed, err)
	}
	for f, ipt := range map[Family]string{IPv4: "iptables-legacy", IPv6: "ip6tables-legacy"} {
		args, _ := os.ReadFile(filepath.Join(dir, ipt+".args"))
		if got := strings.TrimSpace(string(args)); got != "--noflush -w 5" {
			t.Errorf("%s-restore args %q", ipt, got)
		}
		// The chains, then the hooks (none listed) inserted at
		// position 1, in the same restore (the first of the attempts).
		stdin, _ := os.ReadFile(filepath.Join(dir, ipt+".stdin"))
		for _, want := range []string{
			"*raw\n:" + ChainRaw + " - [0:0]\n",
			"-I PREROUTING 1 -m comment --comment \"egressvip: steering, holds and gate\" -j EGRESSVIP-PRE\nCOMMIT\n",
			"-I POSTROUTING 1 -m comment --comment \"egressvip: egress SNAT\" -j EGRESSVIP-SNAT\nCOMMIT\n",
			"-j SNAT --to-source " + map[Family]string{IPv4: lb4.String(), IPv6: lb6.String()}[f],
		} {
			if !strings.Contains(string(stdin), want) {
				t.Errorf("%s-restore input lacks %q:\n%s", ipt, want, stdin)
			}
		}
	}
}
