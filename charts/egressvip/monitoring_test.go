package chart

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// The Prometheus Operator kinds the chart renders, with the JSON names of
// github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1
// (v0.95), cut down to the fields the chart writes or a user's relabelings
// take. That module would pull controller-runtime into egressvip's graph and
// raise the daemon's own dependencies; a strict decode against these copies
// still catches a misspelt or misplaced field.

var monitoringGV = schema.GroupVersion{Group: "monitoring.coreos.com", Version: "v1"}

type NamespaceSelector struct {
	Any        bool     `json:"any,omitempty"`
	MatchNames []string `json:"matchNames,omitempty"`
}

type RelabelConfig struct {
	SourceLabels []string `json:"sourceLabels,omitempty"`
	Separator    *string  `json:"separator,omitempty"`
	TargetLabel  string   `json:"targetLabel,omitempty"`
	Regex        string   `json:"regex,omitempty"`
	Modulus      int64    `json:"modulus,omitempty"`
	Replacement  *string  `json:"replacement,omitempty"`
	Action       string   `json:"action,omitempty"`
}

type ScrapeEndpoint struct {
	Port              string          `json:"port,omitempty"`
	Path              string          `json:"path,omitempty"`
	Interval          string          `json:"interval,omitempty"`
	ScrapeTimeout     string          `json:"scrapeTimeout,omitempty"`
	HonorLabels       bool            `json:"honorLabels,omitempty"`
	MetricRelabelings []RelabelConfig `json:"metricRelabelings,omitempty"`
	Relabelings       []RelabelConfig `json:"relabelings,omitempty"`
}

type PodMonitorSpec struct {
	JobLabel            string               `json:"jobLabel,omitempty"`
	PodMetricsEndpoints []ScrapeEndpoint     `json:"podMetricsEndpoints"`
	Selector            metav1.LabelSelector `json:"selector"`
	NamespaceSelector   NamespaceSelector    `json:"namespaceSelector,omitempty"`
}

type PodMonitor struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`
	Spec              PodMonitorSpec `json:"spec"`
}

type ServiceMonitorSpec struct {
	JobLabel          string               `json:"jobLabel,omitempty"`
	Endpoints         []ScrapeEndpoint     `json:"endpoints"`
	Selector          metav1.LabelSelector `json:"selector"`
	NamespaceSelector NamespaceSelector    `json:"namespaceSelector,omitempty"`
}

type ServiceMonitor struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`
	Spec              ServiceMonitorSpec `json:"spec"`
}

type Rule struct {
	Record        string             `json:"record,omitempty"`
	Alert         string             `json:"alert,omitempty"`
	Expr          intstr.IntOrString `json:"expr"`
	For           *string            `json:"for,omitempty"`
	KeepFiringFor *string            `json:"keep_firing_for,omitempty"`
	Labels        map[string]string  `json:"labels,omitempty"`
	Annotations   map[string]string  `json:"annotations,omitempty"`
}

type RuleGroup struct {
	Name     string            `json:"name"`
	Labels   map[string]string `json:"labels,omitempty"`
	Interval *string           `json:"interval,omitempty"`
	Rules    []Rule            `json:"rules,omitempty"`
}

type PrometheusRule struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`
	Spec              struct {
		Groups []RuleGroup `json:"groups,omitempty"`
	} `json:"spec"`
}

// The decoder needs runtime.Object; the tests never copy these.
func (p *PodMonitor) DeepCopyObject() runtime.Object     { c := *p; return &c }
func (s *ServiceMonitor) DeepCopyObject() runtime.Object { c := *s; return &c }
func (p *PrometheusRule) DeepCopyObject() runtime.Object { c := *p; return &c }

func addMonitoringTypes(s *runtime.Scheme) error {
	s.AddKnownTypes(monitoringGV, &PodMonitor{}, &ServiceMonitor{}, &PrometheusRule{})
	return nil
}
