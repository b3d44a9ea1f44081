package election

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
)

func metaFor(lease types.NamespacedName) metav1.ObjectMeta {
	return metav1.ObjectMeta{Namespace: lease.Namespace, Name: lease.Name}
}
