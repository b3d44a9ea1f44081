package compat

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/vishvananda/netlink"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"

	"github.com/egressvip/egressvip/pkg/kube"
)

// Node says what Gather reads besides the kernel.
type Node struct {
	// Client reads kube-system/cilium-config when Cilium runs on the node
	// (nil: not read).
	Client           kube.Interface
	Backend          string
	Tunnel           bool
	Mark             uint32
	ServiceInterface string
	// ProcNet is /proc/sys/net (tests point it elsewhere).
	ProcNet string
}

// Gather reads this node's Input: link names, sysctls, the rulesets of nft
// and both iptables flavours (binaries that are missing are skipped) and,
// when Cilium runs here, its ConfigMap. It writes nothing.
func Gather(ctx context.Context, n Node) Input {
	in := Input{Backend: n.Backend, Tunnel: n.Tunnel, Mark: n.Mark, ServiceInterface: n.ServiceInterface}
	if links, err := netlink.LinkList(); err == nil {
		for _, l := range links {
			in.Links = append(in.Links, l.Attrs().Name)
		}
	}
	proc := n.ProcNet
	if proc == "" {
		proc = "/proc/sys/net"
	}
	in.Sysctl = func(path string) (string, error) {
		b, err := os.ReadFile(filepath.Join(proc, filepath.Clean("/"+path)))
		return string(b), err
	}
	var rules strings.Builder
	for _, cmd := range [][]string{{"nft", "list", "ruleset"}, {"iptables-legacy-save"}, {"iptables-nft-save"}} {
		if _, err := exec.LookPath(cmd[0]); err != nil {
			continue
		}
		if out, err := exec.CommandContext(ctx, cmd[0], cmd[1:]...).Output(); err == nil {
			rules.Write(out)
			rules.WriteByte('\n')
		}
	}
	in.Ruleset = rules.String()
	if n.Client != nil && in.has("cilium_host") {
		list, err := n.Client.ConfigMaps("kube-system").List(ctx, metav1.ListOptions{FieldSelector: fields.OneTermEqualSelector("metadata.name", "cilium-config").String()})
		if err == nil && len(list.Items) == 1 {
			in.CiliumConfig = list.Items[0].Data
			if in.CiliumConfig == nil {
				in.CiliumConfig = map[string]string{}
			}
		}
	}
	return in
}
