//! Realistic sample conversations (customer support chats and calls, French and English), for
//! `convoflow produce`, the demo, tests and benchmarks. Deterministic for a given seed.

use std::collections::BTreeMap;

use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{RngExt, SeedableRng};

use crate::event::{Conversation, Participant, Turn};

const FIRST_NAMES: &[&str] = &[
    "Marie", "Jean", "Camille", "Lucas", "Chloé", "Hugo", "Sarah", "Thomas", "Emma", "Olivier", "James", "Emily",
    "Michael", "Olivia", "Daniel", "Sophie",
];
const LAST_NAMES: &[&str] =
    &["Martin", "Bernard", "Dubois", "Lefèvre", "Moreau", "Smith", "Johnson", "Brown", "Taylor", "Wilson"];
const CITIES_FR: &[&str] = &["Paris", "Lyon", "Marseille", "Toulouse", "Bordeaux", "Lille", "Nantes", "Strasbourg"];
const CITIES_EN: &[&str] = &["London", "Manchester", "Dublin", "New York", "Boston", "Toronto", "Edinburgh"];
const ORGS: &[&str] = &["Orange", "SNCF", "Air France", "BNP Paribas", "Amazon", "Vodafone", "Renault", "Decathlon"];
const PRODUCTS: &[&str] = &["box internet", "forfait mobile", "carte bancaire", "abonnement", "colis", "billet de train"];
const PRODUCTS_EN: &[&str] = &["broadband router", "mobile plan", "credit card", "subscription", "parcel", "train ticket"];

const AGENT_FR: &[&str] = &[
    "Bonjour, je m'appelle {agent}, conseiller chez {org}. Comment puis-je vous aider aujourd'hui ?",
    "Je comprends tout à fait votre frustration, {customer}. Je regarde votre dossier tout de suite.",
    "Pouvez-vous me confirmer votre adresse à {city}, s'il vous plaît ?",
    "J'ai bien trouvé votre {product}. Il semble qu'un incident ait été signalé dans votre secteur.",
    "Je vous propose un geste commercial de {amount} euros sur votre prochaine facture.",
    "Un technicien passera chez vous à {city} jeudi entre 8 h et 12 h.",
    "Je viens de vous envoyer un e-mail récapitulatif. Avez-vous d'autres questions ?",
    "Merci pour votre patience. Votre dossier numéro {ticket} est maintenant transmis au service technique.",
    "Je suis désolé pour ce désagrément, nous faisons le nécessaire au plus vite.",
];
const CUSTOMER_FR: &[&str] = &[
    "Bonjour, mon {product} ne fonctionne plus depuis trois jours et personne ne me rappelle.",
    "C'est la troisième fois que j'appelle, c'est vraiment inadmissible !",
    "Oui, j'habite toujours au 12 rue de la République à {city}.",
    "D'accord, merci beaucoup, c'est très gentil de votre part.",
    "Je voudrais résilier mon {product}, le service est catastrophique.",
    "Mon conseiller {agent} m'avait promis un remboursement le mois dernier.",
    "Parfait, jeudi matin me convient très bien. Merci {agent} !",
    "Est-ce que je peux suivre ma demande sur l'application {org} ?",
    "Je suis très satisfaite de la rapidité de votre réponse, bravo.",
];
const AGENT_EN: &[&str] = &[
    "Hello, my name is {agent} from {org}. How can I help you today?",
    "I completely understand, {customer}. Let me pull up your account right away.",
    "Could you please confirm your address in {city}?",
    "I can see your {product} here. There was an outage reported in your area this morning.",
    "I can offer you a credit of {amount} pounds on your next bill.",
    "An engineer will visit you in {city} on Thursday between 8am and noon.",
    "I've just sent you a summary by email. Is there anything else I can help with?",
    "Thanks for your patience. Your case number {ticket} has been escalated to our technical team.",
    "I'm sorry for the inconvenience, we're doing everything we can to fix it.",
];
const CUSTOMER_EN: &[&str] = &[
    "Hi, my {product} has stopped working for three days and nobody called me back.",
    "This is the third time I'm calling, it's absolutely unacceptable!",
    "Yes, I still live at 42 High Street in {city}.",
    "Okay, thank you so much, that's really kind of you.",
    "I want to cancel my {product}, the service has been terrible.",
    "Your colleague {agent} promised me a refund last month.",
    "Perfect, Thursday morning works for me. Thanks {agent}!",
    "Can I track my request in the {org} app?",
    "I'm really happy with how quickly you answered, great job.",
];

/// Deterministic generator of sample conversations.
pub struct SampleGenerator {
    seed: u64,
}

impl SampleGenerator {
    pub fn new(seed: u64) -> Self {
        Self { seed }
    }

    /// Conversation number `n`, whole: 15 to 35 turns alternating agent and customer.
    pub fn conversation(&self, n: u64) -> Conversation {
        let mut rng = StdRng::seed_from_u64(self.seed.wrapping_mul(1_000_003).wrapping_add(n));
        let french = rng.random_bool(0.5);
        let agent = format!("{} {}", FIRST_NAMES.choose(&mut rng).unwrap(), LAST_NAMES.choose(&mut rng).unwrap());
        let customer = format!("{} {}", FIRST_NAMES.choose(&mut rng).unwrap(), LAST_NAMES.choose(&mut rng).unwrap());
        let org = *ORGS.choose(&mut rng).unwrap();
        let city = *(if french { CITIES_FR } else { CITIES_EN }).choose(&mut rng).unwrap();
        let product = *(if french { PRODUCTS } else { PRODUCTS_EN }).choose(&mut rng).unwrap();
        let (agent_lines, customer_lines) = if french { (AGENT_FR, CUSTOMER_FR) } else { (AGENT_EN, CUSTOMER_EN) };
        let started_at = 1_767_225_600_000 + (n as i64) * 60_000; // 2026-01-01T00:00Z onwards
        let conversation_id = format!("conv-{:08x}-{n:06}", self.seed as u32);
        let turns_total = rng.random_range(15..=35);
        let mut ts = started_at;
        let turns = (0..turns_total)
            .map(|i| {
                let is_agent = i % 2 == 0;
                let template = *(if is_agent { agent_lines } else { customer_lines }).choose(&mut rng).unwrap();
                let text = template
                    .replace("{agent}", agent.split(' ').next().unwrap())
                    .replace("{customer}", &customer)
                    .replace("{org}", org)
                    .replace("{city}", city)
                    .replace("{product}", product)
                    .replace("{amount}", &rng.random_range(5..80).to_string())
                    .replace("{ticket}", &rng.random_range(100_000..999_999).to_string());
                ts += rng.random_range(2_000..45_000);
                Turn {
                    turn_id: format!("t{i:03}"),
                    speaker: if is_agent { "agent-1".into() } else { "customer-1".into() },
                    role: if is_agent { "agent".into() } else { "customer".into() },
                    text,
                    ts,
                }
            })
            .collect();
        Conversation {
            conversation_id,
            tenant: ["acme", "globex", "initech"][(n % 3) as usize].into(),
            channel: if rng.random_bool(0.6) { "chat".into() } else { "call".into() },
            language: Some(if french { "fr" } else { "en" }.into()),
            started_at,
            participants: vec![
                Participant { id: "agent-1".into(), role: "agent".into(), display_name: Some(agent) },
                Participant { id: "customer-1".into(), role: "customer".into(), display_name: Some(customer) },
            ],
            turns,
            attributes: BTreeMap::from([("source".to_string(), "sample".to_string())]),
        }
    }

    /// Conversation `n` as a producer streaming it would send it: 1 to 3 events, each carrying
    /// the header and the next consecutive turns.
    pub fn conversation_events(&self, n: u64) -> Vec<Conversation> {
        let whole = self.conversation(n);
        let mut rng = StdRng::seed_from_u64(self.seed ^ n.rotate_left(17));
        let parts = rng.random_range(1..=3usize);
        let per_part = whole.turns.len().div_ceil(parts);
        whole
            .turns
            .chunks(per_part)
            .map(|turns| Conversation { turns: turns.to_vec(), ..whole.clone() })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_deterministic_valid_and_split_in_order() {
        let g = SampleGenerator::new(1);
        assert_eq!(g.conversation(3), g.conversation(3));
        assert_ne!(g.conversation(3).conversation_id, g.conversation(4).conversation_id);
        let mut total = 0;
        for n in 0..50 {
            let whole = g.conversation(n);
            whole.validate(&crate::event::EventLimits { max_turn_bytes: 1 << 20, max_turns: 10_000, max_id_bytes: 1_024 }).unwrap();
            let events = g.conversation_events(n);
            assert!((1..=3).contains(&events.len()));
            let rejoined: Vec<_> = events.iter().flat_map(|e| e.turns.clone()).collect();
            assert_eq!(rejoined, whole.turns);
            total += whole.turns.len();
        }
        assert!((15 * 50..=35 * 50).contains(&total));
        let langs: std::collections::HashSet<_> = (0..50).map(|n| g.conversation(n).language.unwrap()).collect();
        assert_eq!(langs.len(), 2, "both French and English");
    }
}
