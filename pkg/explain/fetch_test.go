package explain

import (
	"context"
	"reflect"
	"testing"

	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/egressvip/egressvip/pkg/kube/kubefake"
)

// TestFetchReadsWhatBuildNeeds serves the fixture cluster from a fake API
// server: the report from what Fetch read is the fixture's.
func TestFetchReadsWhatBuildNeeds(t *testing.T) {
	tests := []struct {
		name    string
		cluster func() *cluster
	}{
		{"served", served},
		{"skipped endpoint on another node", func() *cluster {
			c := served()
			c.pod("other", "neighbour", "x", "node-a", podIP("node-a", 9))
			return c
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := tc.cluster()
			var objs []runtime.Object
			for _, o := range c.objs.Services {
				objs = append(objs, o)
			}
			for _, o := range c.objs.EndpointSlices {
				objs = append(objs, o)
			}
			for _, o := range c.objs.Pods {
				objs = append(objs, o)
			}
			for _, o := range c.objs.Nodes {
				objs = append(objs, o)
			}
			for _, o := range c.objs.Leases {
				objs = append(objs, o)
			}
			client := kubefake.Wrap(fake.NewClientset(objs...))
			target := key("default", "sip-client")
			got, err := Fetch(context.Background(), client, target, testConfig())
			if err != nil {
				t.Fatal(err)
			}
			if len(got.Services) != len(c.objs.Services) || len(got.Leases) != len(c.objs.Leases) || len(got.Nodes) != len(nodes) {
				t.Errorf("fetched %d Services, %d Leases, %d Nodes", len(got.Services), len(got.Leases), len(got.Nodes))
			}
			want := Build(target, now, c.objs, testConfig(), nil)
			if r := Build(target, now, got, testConfig(), nil); !reflect.DeepEqual(r, want) {
				t.Errorf("report from the API differs:\n got %+v\nwant %+v", r, want)
			}
		})
	}
}
