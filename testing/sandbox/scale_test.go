package sandbox

import (
	"strings"
	"testing"
)

func TestMetricSamples(t *testing.T) {
	text := `# HELP apiserver_request_total Counter of apiserver requests.
# TYPE apiserver_request_total counter
apiserver_request_total{code="200",component="apiserver",group="coordination.k8s.io",resource="leases",scope="resource",subresource="",verb="PUT",version="v1"} 12
apiserver_request_total{code="409",component="apiserver",group="coordination.k8s.io",resource="leases",scope="resource",subresource="",verb="PUT",version="v1"} 3
apiserver_request_total{code="200",component="apiserver",group="",resource="services",scope="resource",subresource="status",verb="PUT",version="v1"} 1e+03
apiserver_request_total{code="200",component="",group="",resource="",scope="",subresource="/metrics",verb="GET",version=""} 7 1712345678000
apiserver_request_total_other{verb="PUT"} 99
apiserver_request_total{path="a \"quoted\", value}",verb="PUT"} 1
go_goroutines 42
`
	got := MetricSamples(text, "apiserver_request_total")
	if len(got) != 5 {
		t.Fatalf("got %d samples, want 5: %+v", len(got), got)
	}
	if got[2].Value != 1000 || got[2].Labels["subresource"] != "status" {
		t.Errorf("sample 2 = %+v", got[2])
	}
	if got[4].Labels["path"] != `a "quoted", value}` || got[4].Value != 1 {
		t.Errorf("sample 4 = %+v", got[4])
	}
	if g := MetricSamples(text, "go_goroutines"); len(g) != 1 || g[0].Value != 42 {
		t.Errorf("go_goroutines = %+v", g)
	}
}

func TestNFTElements(t *testing.T) {
	table := `table ip egressvip {
	map snat-all {
		type ipv4_addr : ipv4_addr
		elements = { 10.244.1.5 comment "default/web" : 203.0.113.10, 10.244.1.6 comment "default/other" : 203.0.113.11 }
	}
	map snat-ports {
		type ipv4_addr . inet_proto . inet_service : ipv4_addr
		elements = { 10.244.1.7 . udp . 5060 comment "default/web" : 203.0.113.10 }
	}
}`
	got := nftElements(table, "default/web")
	want := []string{"nft 10.244.1.5 --to-source 203.0.113.10", "nft 10.244.1.7 . udp . 5060 --to-source 203.0.113.10"}
	if strings.Join(got, "|") != strings.Join(want, "|") {
		t.Fatalf("got %q, want %q", got, want)
	}
}
