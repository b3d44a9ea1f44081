package snat

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os/exec"
	"strings"
)

// kube-vip's egress state, as its releases write it: the nftables path's
// tables (kube_vip_v4, kube_vip_v6, or kube_vip_<instance>_v4/_v6), the
// iptables path's mangle chain and its nat POSTROUTING rules, commented
// with the base64 of "kube-vip" and the Service's namespace.
const (
	kubeVIPTablePrefix  = "kube_vip"
	kubeVIPEgressChain  = "KUBE-VIP-EGRESS"
	kubeVIPRuleComment  = "a3ViZS12aXAK"
	kubeVIPLeftoversFix = "remove them (nft delete table ...; iptables -t mangle -F/-X KUBE-VIP-EGRESS and its PREROUTING jump; " +
		"the nat POSTROUTING rules commented a3ViZS12aXAK=...) or run kube-vip once with egress_clean=true"
)

// KubeVIPLeftovers lists kube-vip's egress state on this node: while it is
// there, a packet egressvip leaves alone (a denied or unlisted destination)
// can still be SNATed by kube-vip's rules. It reads, never writes; binaries
// that are missing are skipped. Fix says what to do about them.
func KubeVIPLeftovers(ctx context.Context) []string {
	var found []string
	if out, err := exec.CommandContext(ctx, "nft", "list", "tables").Output(); err == nil {
		found = append(found, kubeVIPTables(out)...)
	}
	for _, b := range []backend{legacyBackend, nftBackend} {
		for f, bins := range b.binaries {
			save := bins[2]
			if _, err := exec.LookPath(save); err != nil {
				continue
			}
			for _, table := range []string{"mangle", "nat"} {
				out, err := exec.CommandContext(ctx, save, "-t", table).Output()
				if err != nil {
					continue
				}
				for _, what := range kubeVIPRules(out, table) {
					found = append(found, fmt.Sprintf("iptables-%s %s %s", b.name, Families[f], what))
				}
			}
		}
	}
	return found
}

// KubeVIPLeftoversFix is what to do about KubeVIPLeftovers.
func KubeVIPLeftoversFix() string { return kubeVIPLeftoversFix }

// kubeVIPTables returns kube-vip's tables in `nft list tables` output.
func kubeVIPTables(out []byte) []string {
	var found []string
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) == 3 && f[0] == "table" && strings.HasPrefix(f[2], kubeVIPTablePrefix) {
			found = append(found, "nftables table "+f[1]+" "+f[2])
		}
	}
	return found
}

// kubeVIPRules returns kube-vip's chain and rules in one table of
// iptables-save output.
func kubeVIPRules(out []byte, table string) []string {
	var found []string
	rules := 0
	sc := bufio.NewScanner(bytes.NewReader(out))
	sc.Buffer(make([]byte, 0, 64*1024), 1<<20)
	for sc.Scan() {
		l := sc.Text()
		switch {
		case strings.HasPrefix(l, ":"+kubeVIPEgressChain+" "):
			found = append(found, table+" chain "+kubeVIPEgressChain)
		case strings.HasPrefix(l, "-A ") && strings.Contains(l, kubeVIPRuleComment):
			rules++
		}
	}
	if rules > 0 {
		found = append(found, fmt.Sprintf("%s: %d rules commented %s", table, rules, kubeVIPRuleComment))
	}
	return found
}
