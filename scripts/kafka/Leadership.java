// Moves partition leadership with Kafka's own Admin client, for the fault matrix
// (tests/failover/faults.rs). Run as a single-file program:
//
//   java -cp ".cache/kafka/<version>/libs/*" scripts/kafka/Leadership.java BOOTSTRAP COMMAND TOPIC BROKER
//
// Commands, each for the partitions of TOPIC that BROKER leads now:
//   elect-away   reorder each one's replicas so that BROKER comes last, then run a preferred-leader
//                election: leadership moves to another in-sync replica (the broker stays a
//                replica)
//   reassign-away  reassign each one to its replicas without BROKER (a replica removed: the
//                cluster moves leadership, copies nothing), and wait until the reassignment is done
//   reassign-back  reassign every partition of TOPIC that lacks BROKER to its replicas plus BROKER
//                (a replica added and caught up by replication), and wait until it is done
//   await-isr    wait (at most 120 s) until BROKER is in the ISR of every partition of TOPIC it
//                is a replica of (after a restart, before the next broker is stopped)
// Prints one line per partition moved; exits 1 with the exception on failure.
import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.Optional;
import java.util.Properties;
import java.util.Set;
import java.util.concurrent.TimeUnit;
import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;
import org.apache.kafka.clients.admin.NewPartitionReassignment;
import org.apache.kafka.clients.admin.TopicDescription;
import org.apache.kafka.common.ElectionType;
import org.apache.kafka.common.Node;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.TopicPartitionInfo;

public class Leadership {
    public static void main(String[] args) throws Exception {
        if (args.length != 4) {
            System.err.println("usage: Leadership BOOTSTRAP elect-away|reassign-away|reassign-back TOPIC BROKER");
            System.exit(64);
        }
        Properties props = new Properties();
        props.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, args[0]);
        String command = args[1];
        String topic = args[2];
        int broker = Integer.parseInt(args[3]);
        try (Admin admin = Admin.create(props)) {
            if (command.equals("await-isr")) {
                awaitIsr(admin, topic, broker);
                return;
            }
            TopicDescription d = admin.describeTopics(List.of(topic)).allTopicNames().get(30, TimeUnit.SECONDS).get(topic);
            Map<TopicPartition, Optional<NewPartitionReassignment>> moves = new HashMap<>();
            for (TopicPartitionInfo p : d.partitions()) {
                List<Integer> replicas = new ArrayList<>();
                for (Node n : p.replicas()) replicas.add(n.id());
                boolean led = p.leader() != null && p.leader().id() == broker;
                List<Integer> target = new ArrayList<>(replicas);
                switch (command) {
                    case "elect-away":
                        if (!led) continue;
                        target.remove(Integer.valueOf(broker));
                        target.add(broker);
                        break;
                    case "reassign-away":
                        if (!led) continue;
                        target.remove(Integer.valueOf(broker));
                        break;
                    case "reassign-back":
                        if (replicas.contains(broker)) continue;
                        target.add(broker);
                        break;
                    default:
                        System.err.println("unknown command " + command);
                        System.exit(64);
                }
                TopicPartition tp = new TopicPartition(topic, p.partition());
                moves.put(tp, Optional.of(new NewPartitionReassignment(target)));
                System.out.println(command + " " + tp + ": replicas " + replicas + " -> " + target);
            }
            if (moves.isEmpty()) return;
            admin.alterPartitionReassignments(moves).all().get(30, TimeUnit.SECONDS);
            // A reassignment is done when the cluster no longer lists it.
            long until = System.nanoTime() + TimeUnit.SECONDS.toNanos(60);
            while (!admin.listPartitionReassignments(moves.keySet()).reassignments().get(30, TimeUnit.SECONDS).isEmpty()) {
                if (System.nanoTime() > until) throw new IllegalStateException("reassignment not done after 60 s");
                Thread.sleep(100);
            }
            if (command.equals("elect-away")) {
                admin.electLeaders(ElectionType.PREFERRED, Set.copyOf(moves.keySet())).all().get(30, TimeUnit.SECONDS);
                System.out.println("preferred leaders elected");
            }
        } catch (Exception e) {
            System.out.println("FAILED " + e.getClass().getName() + ": " + e.getMessage());
            System.exit(1);
        }
    }

    static void awaitIsr(Admin admin, String topic, int broker) throws Exception {
        long until = System.nanoTime() + TimeUnit.SECONDS.toNanos(120);
        while (true) {
            boolean synced = true;
            try {
                TopicDescription d = admin.describeTopics(List.of(topic)).allTopicNames().get(30, TimeUnit.SECONDS).get(topic);
                for (TopicPartitionInfo p : d.partitions()) {
                    boolean replica = p.replicas().stream().anyMatch(n -> n.id() == broker);
                    boolean inSync = p.isr().stream().anyMatch(n -> n.id() == broker);
                    if (replica && !inSync) synced = false;
                }
            } catch (Exception e) {
                synced = false;
            }
            if (synced) {
                System.out.println("broker " + broker + " in sync for " + topic);
                return;
            }
            if (System.nanoTime() > until) throw new IllegalStateException("broker " + broker + " not in sync after 120 s");
            Thread.sleep(200);
        }
    }
}
